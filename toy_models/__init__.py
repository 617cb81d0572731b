"""Targets with known ground truth. Each module holds a model, its data, its training recipe and a
ground-truth description; `spd` never imports this package (configs name a factory, resolved at run time).
"""

TOYS = {
    "tms": "toy_models.tms:tms_task",
}
