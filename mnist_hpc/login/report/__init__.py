"""``mnist-hpc-report``: one table and a few plots for a sweep (or a single run) directory.

Its parts, by name: which trials there are and what they say is :mod:`mnist_hpc.login.trials`
(shared with status); :mod:`.ranking` picks the best trial; :mod:`.tables` writes the text
(Markdown, CSV, confusion matrix); :mod:`.plots` draws the PNGs and skips unchanged ones;
:mod:`.build` puts them together; :mod:`.cli` is the command line.
"""
