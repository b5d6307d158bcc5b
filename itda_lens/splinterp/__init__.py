"""SplInterp's baselines (Budd et al., 2025): PAM-SGD (``pam``), fitting k-means and local-PCA
autoencoders (``kmeans``), and power-diagram diagnostics of encoders (``power``)."""
