"""The folder nnUNet_extTrainer points at (``nnunet-ssl ext-path``): re-export shims only.

nnU-Net imports every module here under its bare file name and drops it from sys.modules
afterwards, so nothing may be defined here: the classes live in ``nnunet_ssl.trainers``.
"""
