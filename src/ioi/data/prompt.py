"""One IOI prompt as structured data, and how it renders to text.

A :class:`Prompt` is a template plus the words that fill it. The four *name slots* are the name
placeholders in textual order:

====  =======================================  ==================================
slot  ABBA template                            BABA template
====  =======================================  ==================================
0     first name of clause 1 = IO              first name of clause 1 = S1
1     second name of clause 1 = S1             second name of clause 1 = IO
2     S2 (second mention of the subject)       S2
3     the answer, the last word of the text    the answer
====  =======================================  ==================================

For a clean IOI prompt the slots hold ``(IO, S, S, IO)`` (ABBA) or ``(S, IO, S, IO)`` (BABA).
Corruptions (``ioi.data.flips``) overwrite slots, and track the ``io``/``s`` labels separately:
the labels say which token ids the logit difference compares, the slots say what the text reads.
"""

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ioi.data.templates import PLACEHOLDER, custom_template_id

N_NAME_SLOTS = 4
ANSWER_SLOT = 3


@dataclass(frozen=True)
class RenderedPrompt:
    """Text of a prompt and the character span ``[start, end)`` of each name slot's word."""

    text: str
    slot_spans: tuple[tuple[int, int], ...]

    @property
    def text_without_answer(self) -> str:
        """The text up to and including END (drops the space and the answer word)."""
        return self.text[: self.slot_spans[ANSWER_SLOT][0] - 1]


@dataclass(frozen=True)
class Prompt:
    """A filled template.

    Attributes:
        template_id: "BABA-3", "ABBA-0", "custom-0", ...
        template: the template string.
        names: the words in the four name slots, in textual order (see the module docstring).
        place / object: the [PLACE] / [OBJECT] word, or None when the template has none.
        io / s: the IO and S labels (the names whose logits the task compares).
        seen_names: every name this prompt or its ancestors held (fresh corruption names avoid
            them), in first-seen order.
    """

    template_id: str
    template: str
    names: tuple[str, str, str, str]
    place: str | None
    object: str | None
    io: str
    s: str
    seen_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.names) != N_NAME_SLOTS:
            raise ValueError(f"A prompt has {N_NAME_SLOTS} name slots, got {self.names!r}")
        if not self.seen_names:
            object.__setattr__(
                self, "seen_names", ordered_union((), (self.io, self.s, *self.names))
            )

    @functools.cached_property
    def rendered(self) -> RenderedPrompt:
        return render(self)

    @property
    def text(self) -> str:
        """The full sentence, including the final answer word (as in the paper code)."""
        return self.rendered.text

    def with_slots(
        self,
        names: tuple[str, ...],
        *,
        io: str | None = None,
        s: str | None = None,
        new_words: tuple[str, ...] = (),
    ) -> "Prompt":
        """A copy with new slot words and labels; ``new_words`` join ``seen_names``."""
        io = self.io if io is None else io
        s = self.s if s is None else s
        seen = ordered_union(self.seen_names, (*new_words, io, s, *names))
        return replace(self, names=tuple(names), io=io, s=s, seen_names=seen)


def ordered_union(first: tuple[str, ...], more: tuple[str, ...]) -> tuple[str, ...]:
    """``first`` followed by the words of ``more`` not already present (order-stable, no sets)."""
    out = list(first)
    for word in more:
        if word not in out:
            out.append(word)
    return tuple(out)


def render(prompt: Prompt) -> RenderedPrompt:
    """Fill the template: name placeholders take ``prompt.names`` in order."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    length = 0
    names = iter(prompt.names)
    for match in PLACEHOLDER.finditer(prompt.template):
        literal = prompt.template[cursor : match.start()]
        pieces.append(literal)
        length += len(literal)
        kind = match.group(1)
        if kind == "PLACE":
            word = prompt.place
        elif kind == "OBJECT":
            word = prompt.object
        else:
            word = next(names)
        if word is None:
            raise ValueError(f"Prompt for template {prompt.template!r} has no word for [{kind}]")
        if kind in ("A", "B"):
            spans.append((length, length + len(word)))
        pieces.append(word)
        length += len(word)
        cursor = match.end()
    pieces.append(prompt.template[cursor:])
    return RenderedPrompt(text="".join(pieces), slot_spans=tuple(spans))


def clean_slots(template_form: str, io: str, s: str) -> tuple[str, str, str, str]:
    """Slot words of a clean IOI prompt: (IO, S, S, IO) for ABBA, (S, IO, S, IO) for BABA."""
    return (io, s, s, io) if template_form == "ABBA" else (s, io, s, io)


def prompt_from_mapping(record: Mapping, template_form_of) -> Prompt:
    """Build a :class:`Prompt` from a dict.

    Accepts the keys of :meth:`IOIDataset.to_records` (``template``/``template_id``, ``io``, ``s``,
    ``names``, ``place``, ``object``, ``seen_names``) or the paper-style capitalised keys ``IO``,
    ``S``, ``PLACE``, ``OBJECT``. Without ``names`` the slots are those of a clean IOI prompt.
    ``template_form_of`` maps a template string to its form ("ABBA"/"BABA").
    """

    def get(*keys, default=None):
        for key in keys:
            if key in record and record[key] is not None:
                return record[key]
        return default

    template = get("template")
    template_id = get("template_id")
    if template is None:
        from ioi.data.words import TEMPLATES_BY_ID

        if template_id not in TEMPLATES_BY_ID:
            raise ValueError(f"Unknown template {template_id!r} in prompt record {dict(record)!r}")
        template = TEMPLATES_BY_ID[template_id]
    template_id = template_id or custom_template_id(template)
    io, s = get("io", "IO"), get("s", "S")
    if io is None or s is None:
        raise ValueError(f"Prompt record needs 'io' and 's' names: {dict(record)!r}")
    names = get("names")
    names = tuple(names) if names is not None else clean_slots(template_form_of(template), io, s)
    seen = get("seen_names")
    return Prompt(
        template_id=template_id,
        template=template,
        names=names,
        place=get("place", "PLACE"),
        object=get("object", "OBJECT"),
        io=io,
        s=s,
        seen_names=tuple(seen) if seen is not None else (),
    )
