"""`kfac.keras.saving_utils.load_model`: placeholder until saving lands."""
