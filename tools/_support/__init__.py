"""What the tools and the tests both need, kept here because tools never import tests.

``ports`` (a free loopback port, waiting for a listener), ``memory`` (a process's RSS and peak RSS), ``synthetic``
(random models in Hugging Face and .slm form, large manifests), ``mutate`` (a .slm file taken apart and put back),
``hosts`` (real web servers and a caching edge started on loopback) and ``caches`` (a cache checked byte-exact).
Tools import them as ``_support.*`` (their own folder is on ``sys.path``); ``tests/support`` re-exports them, so
tests import ``tests.support.*`` only. Test-only helpers (fixtures' servers, fault injection) stay in tests/support.
"""
