"""Synthesis: Synthetic Bootstrapped Pretraining (SBP), the document-conditioned source.

:mod:`~selftrain.synthesis.pairs` (``selftrain pairs``: related-document pairs by embedding
nearest neighbours, near-copies dropped; the search in :mod:`~selftrain.synthesis.neighbours`),
:mod:`~selftrain.synthesis.layout` (a pair as one ``BOS d1 SEP d2 EOS`` training row with the
loss on d2, and the same prompt for sampling), :mod:`~selftrain.synthesis.synthesize`
(``selftrain synthesize``: one new document per seed document, a corpus dir of ``kind: sbp``).
The synthesizer itself trains with ``selftrain fit`` on a pairs dir.

May import: the core, ``decoding``, ``sampling`` and ``curation``.
"""
