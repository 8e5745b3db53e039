import sys

from lenet_tf.cli import main

sys.exit(main())
