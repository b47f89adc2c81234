"""The experiments layer: above training (it trains runs and scores them with the metrics layer).

    mapdit.experiments.budgets   the training and scoring budgets (frozen dataclasses); the study's budget
                                 (StudyBudget FULL, QUICK), rate brackets and arms
    mapdit.experiments.fid_run   FID of a trained run (`mapdit fid`): sample, keep, score, record
    mapdit.experiments.ablate    `mapdit ablate`: configs x modulations x seeds with one budget, the table
    mapdit.experiments.study     `mapdit study`: the paper's CPU-sized study, resumable
    mapdit.experiments.results   the study's stored runs, best rates, paired verdicts, plots and RESULTS.md
"""
