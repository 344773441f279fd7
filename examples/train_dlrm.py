"""Command line of the example trainer: ``python -m examples.train_dlrm --help`` (methods, data and
flags are described in ``examples/harness/cli.py``, whose docstring the help prints).

    python -m examples.train_dlrm --method cafe --compression-ratio 100
"""

from examples.harness.cli import main

if __name__ == "__main__":
    main()
