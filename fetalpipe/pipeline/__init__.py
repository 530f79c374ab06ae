"""The jobs, in the order data goes through them: Ray Data preprocessing, training, the predictions table, inference, evaluation, calibration, overlays and the run report, scheduled studies."""
