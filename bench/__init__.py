"""turbo-fx's measurement tools, installed as ``turbo_fx.bench`` and run by one command line,
``turbo-fx <study>`` (``cli``: each study one declarative entry). Studies: ``speed`` (bench),
``suites`` / ``evaluation`` (eval), ``analysis`` (analyze), ``visualize``, ``merge_paths``,
``diffusion_speed``, ``generation_eval`` (diffusion-fidelity), ``vlm_speed``, ``vlm_eval``. Shared:
``timing`` (machine, compile caches, interleaved rounds), ``output`` (JSON, markdown cells),
``stats`` / ``intervals`` / ``fidelity`` / ``diffusion_fidelity`` (metrics with 95% intervals),
``results`` / ``plots`` (evaluation tables and figures).

Nothing in the backend imports this package: ``backend="turbo"`` needs only ``turbo_fx`` and
``turbo_fx.passes``. Modules here import their heavy dependencies (matplotlib, scikit-learn,
scipy) where they use them.
"""
