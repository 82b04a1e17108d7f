"""The paper's study as cells driven by params.yaml: params (params.yaml typed and checked once), plan
(what each cell is), cell (mix, classifier, evaluations), compare (families against baselines), distance
(replicas' Fréchet distances), summary and report (the page people read: load, prose, plots, html)."""
