"""The built-in demo: SCFM on a small digits teacher, offline on a CPU. A consumer of ``scfm_diffusers``.

``digits`` trains (or reuses) the teacher and the digit classifier; ``demo`` distills the teacher with the
training script, trains a reflow baseline at equal compute and writes the report. With this folder's parent
(``examples/``) on the path::

    PYTHONPATH=examples python -m digits_demo --output_dir demo_output   # make demo
    PYTHONPATH=examples python -m digits_demo.digits DIR                 # teacher and classifier only

Nothing is imported here, so that ``python -m digits_demo.digits`` runs that module once, as ``__main__``.
"""
