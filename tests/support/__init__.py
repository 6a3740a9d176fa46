"""Every helper the tests use, and nothing a test module defines for another.

Test-only: ``serving`` (the bundled server on a thread), ``faulty`` (a server that injects faults), ``checks``
(assertions and process starters), ``hub`` (a redirecting hub), ``relay`` (a counting TCP relay), ``tensors``,
``cli`` (the console script in a subprocess), ``paths`` (the repository and tests/fixtures), ``previews`` (a progressive
decoder's two results), ``finetune`` (fine-tuned versions of the tiny Llama).
Shared with the tools, which never import tests, and re-exported here from ``tools/_support``: ``ports``, ``memory``,
``synthetic``, ``mutate``, ``hosts`` (and, through ``checks``, the cache checks).
"""
