"""The purchase-propensity model (docs/model.md). Modules, lowest first, and their public functions:

- ``labels``: ``build_training_set``, ``read_training_set``, ``check_no_leakage``, ``label_window``, ``users_by_bucket``
- ``registry``: ``promote``, ``rollback``, ``champion_as_of``, ``record_decision``, ``update_model_dir``,
  ``MODEL_KINDS``, the model directory's file names
- ``inputs``: ``model_inputs``, ``numpy_inputs``, ``numeric_matrix``, ``categorical_values``, ``vocabulary``
- ``network``: ``ModelConfig``, ``build_network``, ``fit_network``, ``predict_network``, ``validation_split``
- ``calibration``: ``fit_calibration``, ``apply_calibration``, ``calibration_note``, ``population_deciles``
- ``metrics``: ``metrics``, ``auc``, ``ece_debiased``, ``bootstrap_intervals``, ``card_curves``,
  ``permutation_importance``
- ``inference``: ``export_network``, ``InferenceNetwork`` (numpy forward pass, no TensorFlow)
- ``gbm``: ``fit_gbm``, ``GBMModel``
- ``ensemble``: ``blend``, ``EnsembleScorer`` (the network and LightGBM of a version, blended)
- ``sequence``: ``sequence_inputs``, ``train_sequence``, ``load_sequence``, ``SequenceScorer``
- ``card``: ``model_card``, ``card_files``
- ``artifacts``: ``write_model_dir``, ``export_inference``, ``load_model``, ``LoadedModel``, ``version_kinds``
- ``candidates``: ``version_candidates``
- ``scoring``: ``score_profiles`` (stage), ``read_scores``, ``scoring_model``, ``heuristic_scores``
- ``training``: ``train_challenger`` (stage), ``train_version``, ``fit_models``, ``retrain_due``
- ``drift``: ``psi``, ``snapshot_drift``, ``hourly_drift``
- ``gate``: ``GateConfig``, ``gate``, ``choose``
- ``promotion``: ``evaluate_and_promote`` (stage), ``model_report``
"""
