"""Sample-quality evaluation: Fréchet distances (FID with Inception, FD with our Fashion-MNIST
classifier's features) and class-conditioning accuracy.

    mapdit.evaluate.fid                Fréchet distance, streaming feature statistics, extractors,
                                       cached reference statistics, `evaluate_samples`
    mapdit.evaluate.fmnist_classifier  the small Fashion-MNIST CNN shipped in mapdit/assets
"""
