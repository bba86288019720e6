"""Domain experts (Branch-Train-Merge): branch a seed per domain, train each expert as an
independent job (:mod:`hone.experts.branch`), then merge them by parameter averaging or
ensemble them by domain posterior (:mod:`hone.experts.merge`, :mod:`hone.experts.ensemble`).

    hone branch recipes/tiny-experts.toml            # experts/NAME/ per [[experts.domain]]
    hone merge experts/bio/final experts/code/final -o merged --weights 2,1
    hone merge experts/*/final -o ens --method ensemble && hone eval ens --data bio=bio.jsonl
"""
