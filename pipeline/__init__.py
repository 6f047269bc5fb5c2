"""synsetforge: build ImageNet-style datasets from WordNet synsets.

The package holds every stage's pure core and thin I/O shell; nothing here imports Airflow.
"""

__version__ = "0.1.0"
