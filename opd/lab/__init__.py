"""`opd lab`: the paper's OPD phenomena reproduced on a toy world in minutes, each judged by a criterion fixed in code.

`opd.toy.lab_world` is the world (2-digit addition, two thinking patterns, real ambiguity, two prompt templates);
`config` holds every budget, `stages` the cached jobs (SFT, cold start, OPD, pre-flight check), `plan` who is
trained and which pairs run, `criteria` the phenomena and their pass rules, `report` the markdown and figure, `cli`
the command.
"""
