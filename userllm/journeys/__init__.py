"""Interest journeys (Christakopoulou et al. 2023, "Large Language Models for User Interest Journeys") on
top of User-LLM: per-user extraction of persistent interests from the pretrained encoder's item
embeddings, naming them with the LLM (few-shot prompting, prompt-tuning, fine-tuning) and evaluation.

    extract.py     clustering of each user's events, persistence filter, salience, journey quality
    references.py  names from the data (tags, categories, titles): supervision, references, baseline
    naming.py      the three naming methods and the LLM they run on
    scoring.py     ROUGE and tag match of names, tables
    plot.py        the per-user timeline PNG
    run.py         ``python -m userllm.journeys`` (config in config.py)
"""

from .config import JourneysConfig
from .extract import Journey, UserJourneys, cluster_events, item_vectors, journey_quality, user_journeys
from .references import LabelSource
from .scoring import name_scores

__all__ = ["JourneysConfig", "Journey", "UserJourneys", "cluster_events", "item_vectors", "journey_quality",
           "user_journeys", "LabelSource", "name_scores"]
