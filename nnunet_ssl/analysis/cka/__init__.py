"""Layer-wise CKA between two encoders of one architecture (``nnunet-ssl cka``), one module per step of a run.

The encoders are of any network family (:mod:`nnunet_ssl.networks.family`): Swin, per Swin block, or
nnU-Net's residual encoder (ResEnc), per residual block.

Read a run top to bottom; each module is visited once:

1. :mod:`.run`: what a run compares (:class:`~.run.CKASettings`), the orchestration of one run
   (:func:`~.run.run_cka`, or :func:`~.run.cka_between_folds` for two fine-tuned folds) and its
   result (:class:`~.run.CKAResult`).
2. :mod:`.gather`: the two encoders (an export or pretraining run, an nnU-Net fold), the layers
   (named per family by :mod:`.layers`), the seeded patches of the raw images preprocessed as the
   fold was, and each layer's Gram matrix per minibatch.
3. :mod:`.compare`: the math, pure functions: linear CKA, the unbiased HSIC and minibatch CKA.
4. :mod:`.render`: the log table, the CSV tables and the PNG figures.

Nothing is imported here, so that :mod:`.compare` stays importable without nnU-Net.
"""
