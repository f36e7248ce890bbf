"""The purchase-propensity model: labels, training, candidates, the gate, the registry and scoring
(``training.train_challenger``, ``evaluate.evaluate_and_promote``, ``training.score_profiles``). docs/model.md.
"""
