"""Small utilities: compiled-program cost counting (``hlo_cost``)."""
