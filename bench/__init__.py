"""turbo-fx's measurement tools, installed as ``turbo_fx.bench``: the fidelity evaluation
(``evaluation``, ``suites``, ``fidelity``, ``stats``), result tables and plots (``results``,
``plots``), speed and compile timing (``speed``, ``timing``, ``bench_vit``), the redundancy
analysis and merge maps (``analysis``, ``visualize``) and the ``turbo-fx`` command line
(``cli``).

Nothing in the backend imports this package: ``backend="turbo"`` needs only ``turbo_fx``
and ``turbo_fx.passes``. Modules here import their heavy dependencies (matplotlib,
scikit-learn, scipy) where they use them.
"""
