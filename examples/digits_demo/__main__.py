"""``PYTHONPATH=examples python -m digits_demo``: the demo's command line (see :mod:`digits_demo.demo`)."""

from .demo import main

if __name__ == "__main__":
    main()
