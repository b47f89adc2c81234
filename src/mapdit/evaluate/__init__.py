"""The metrics layer: measures samples, models and runs; below training (it never imports `mapdit.train`
or `mapdit.experiments`, which is tested), so that training can log its metrics.

    mapdit.evaluate.fid                Fréchet distance, streaming feature statistics, extractors,
                                       cached reference statistics, `evaluate_samples`
    mapdit.evaluate.fmnist_classifier  the small Fashion-MNIST CNN shipped in mapdit/assets
    mapdit.evaluate.scoring            the feature and reference rules of a run's data; `quick_fid`
    mapdit.evaluate.magnitudes         activation and weight magnitudes per block (the paper's Figure 5)
    mapdit.evaluate.heldout            held-out ε-MSE of a run
"""
