"""Mix stage: proxy sweeps over domain ratios and token budgets (:mod:`hone.mix.sweep`), the
CMR and D-CPT laws fitted to them and the chosen ratio (:mod:`hone.mix.laws`, written to
``mixture.json``). The schedule the trainer follows lives in :mod:`hone.train.mixture`.
"""
