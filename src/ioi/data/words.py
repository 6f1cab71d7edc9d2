"""The paper's word lists and sentence templates, verbatim from its code.

Source: redwoodresearch/Easy-Transformer, ``easy_transformer/ioi_dataset.py`` (commit ea15315),
the code behind Wang et al. 2022, "Interpretability in the Wild" (arXiv 2211.00593), Appendix E.

* ``NAMES``: the code's 99 first names (the paper's text says 100), in the code's order.
* ``PLACES`` / ``OBJECTS``: 8 + 8 words (the paper's text says 20 in all).
* ``ANIMALS``: 18 words used by the code's ("IO", "ANIMAL") style corruptions. Six of them
  (hippo, giraffe, husky, panther, beaver, ferret) are *not* single GPT-2 tokens; the corruption
  code skips those (see ``ioi.data.flips``).
* ``BABA_TEMPLATES``: the 15 templates of Figure 14, in order, so index ``k`` is the paper's
  template ``k + 1``. ``[A]`` = indirect object (IO), ``[B]`` = subject (S).
* ``ABBA_TEMPLATES``: the same 15 with the first ``[B]`` and ``[A]`` of the first clause swapped
  (the code derives them with a character loop; written out here, and a test checks the swap).

Every template has exactly four name slots, in textual order: two in the first clause (IO and S1,
in either order), S2, and the final answer ``[A]`` that ends the sentence.
"""

NAMES: tuple[str, ...] = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas",
    "Anthony", "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven",
    "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany",
    "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany",
    "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen",
    "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul",
    "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis",
    "Lisa", "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie",
    "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison",
    "Bradley", "Samuel",
)  # fmt: skip

PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)  # fmt: skip

OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)  # fmt: skip

ANIMALS: tuple[str, ...] = (
    "dog", "cat", "snake", "elephant", "beetle", "hippo", "giraffe", "tiger", "husky", "lion",
    "panther", "whale", "dolphin", "beaver", "rabbit", "fox", "lamb", "ferret",
)  # fmt: skip

BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",  # noqa: E501
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)

ABBA_TEMPLATES: tuple[str, ...] = (
    "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [A] and [B] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [A] and [B] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [A] and [B] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",  # noqa: E501
    "Then, [A] and [B] had a long argument, and afterwards [B] said to [A]",
    "After [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [A] and [B] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [A] and [B] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [A] and [B] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [A] and [B] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [A] and [B] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)

#: The paper code's default ``nb_templates=15`` makes "mixed" use only the first ``15 // 2 = 7``
#: templates of each form (paper templates 1-7); its "BABA" and "ABBA" take all 15 of their form.
PAPER_TEMPLATES_PER_FORM = 7

#: Template ids, "BABA-k" / "ABBA-k" with k = 0..14 (paper template k + 1), in canonical order.
TEMPLATE_IDS: tuple[str, ...] = tuple(f"BABA-{k}" for k in range(len(BABA_TEMPLATES))) + tuple(
    f"ABBA-{k}" for k in range(len(ABBA_TEMPLATES))
)

#: Template id -> template string.
TEMPLATES_BY_ID: dict[str, str] = dict(
    zip(TEMPLATE_IDS, BABA_TEMPLATES + ABBA_TEMPLATES, strict=True)
)
