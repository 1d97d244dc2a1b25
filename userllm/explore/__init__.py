"""Exploration with a novelty LLM scaled at inference time and best-of-n selection by a user-aligned LLM.

An implementation of Wang et al. (Google, 2025), "User Feedback Alignment for LLM-powered Exploration in
Large-scale Recommendation Systems" (arXiv 2504.05522), on top of User-LLM:

1. :mod:`.clusters`: interest clusters (KMeans over the pretrained encoder's item embeddings, with short
   text labels), novel transitions (an event whose cluster is absent from the window before it) and
   their feedback (rating and/or engagement afterwards);
2. :mod:`.models`: the **novelty LLM** (writes the next novel cluster's label) and the **user-aligned
   LLM** (yes/no: will the user like this new cluster?), both UserLLMs that read the user's events
   through cross-attention and the recent clusters as text; :mod:`.sampling`: decoding constrained by a
   per-user prefix trie to the labels of clusters new for the user; :mod:`.pairs`: the aligned LLM's
   (context, candidate) pairs and the held-out AUCs that say whether it learnt; :mod:`.probe`: how
   learnable those pairs are by logistic regression on simple features (``python -m userllm.explore.probe``);
3. :mod:`.evaluate`: best-of-n (sample n, the aligned LLM picks one; then the encoder ranks the items
   inside it) against random / popular / greedy / aligned-ranks-all, on held-out users' next novel
   transition, with cost, diversity, a table and a curve over n; :mod:`.concentration`: how the
   aligned selector concentrates the picks (read back from the per-user picks);
4. :mod:`.run`: the experiment per seed and over seeds (``python -m userllm.explore``).
"""
