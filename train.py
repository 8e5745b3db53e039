#!/usr/bin/env python3
"""Trains LeNet-5 on Fashion-MNIST and exports it: `python train.py --help`.

Kept thin on purpose: same as `lenet-tf train ...`; everything lives in lenet_tf.
"""

import sys

from lenet_tf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
