"""The search: Ray Tune + Optuna over ATP trials. Modules import Ray themselves, never this package."""
