"""captioner: attention-based image captioning (Show, Attend and Tell) and attention NMT.

Symbols used in every docstring and shape comment of the package
-----------------------------------------------------------------
==========  =============================================================
``B``       batch size (images or source sentences)
``C``       channels of an image or a feature map
``H x W``   spatial grid of annotation vectors (``H``, ``W`` for images too)
``L``       number of annotation vectors, ``L = H * W`` (or ``S`` for text)
``S``       source sentence length (translation); plays the role of ``L``
``D``       annotation (context) vector size
``T``       decoding steps: tokens predicted per caption / target, ``<end>`` included;
            with its ``<start>`` a caption is ``T + 1`` tokens
``V``       vocabulary size
``E``       word-embedding size
``N``       LSTM hidden size (the paper's ``n``)
``A``       attention (score) hidden size
``K``       beam size
==========  =============================================================

Plain ``nn.Module`` components (``captioner.encoders``, ``captioner.attention``,
``captioner.decoder``, ``captioner.search``) never import Lightning; the Lightning modules,
callbacks and loggers (``captioner.lit``), the data modules (``captioner.data.datamodule``,
``.cached``, ``.parallel``) and the command line (``captioner.cli``) do
(``tests/test_layering.py`` holds the list); the inference commands only where they read a
data config.
"""

__version__ = "0.1.0"
