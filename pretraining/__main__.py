"""``python -m nnunet_ssl.pretraining ...`` (e.g. under torchrun) is ``nnunet-ssl pretrain ...``."""
import sys

from nnunet_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
