"""One model's download, top to bottom: header, cache, schedule, workers, pipeline, readiness.

- ``header``: read a model's header (preamble + manifest) from any source and validate it off the event loop.
- ``origin``: where the header comes from (file, cache, URL) and a source for the bytes the cache lacks.
- ``session``: ``DownloadSession``: header -> cache -> download -> layers, what ``Model`` drives.
- ``chunk_index``: ``ChunkIndex``: what the manifest's chunk table says about the layers, built once.
- ``cached_chunks``: ``CachedChunks``: the chunks the cache held when opened, each checked once per opened model.
- ``model_download``: ``Download``: the one owner of the scheduler, readiness, pipeline, committer, workers and delta
  stream; it drains what they hand over through its one completion route.
- ``workers``: ``Workers``: take spans from the scheduler, open them on each live source, hand landed batches over.
- ``sources``: ``Sources``: the primary and each mirror; probed, judged, dropped when failing.
- ``schedule``: which chunks to fetch next (file order, demanded first); the only place spans are cut.
- ``layout``: where the chunks lie in the file (offsets, sizes, holes), the scheduler's read-only view.
- ``demands``: the positions someone waits for, oldest first, the scheduler's queue of them.
- ``span``: a span: chunks back to back in the file, fetched with one request.
- ``pipeline``: receive -> verify -> decompress -> store on pool threads, one route back to the event loop.
- ``landed``: what a batch of chunks became, the queue carrying it to the event loop, and the download's handover.
- ``readiness``: what a caller can wait for (a layer, its coarse levels, rows, the whole model) and progress.
- ``refinements``: a progressive model's refinement plan: what each refinement chunk folds into.
- ``mirrors``: several hosts of one model: which may be used, how fast each is, how large a span each takes.
- ``updates``: an update's chunks copied from other cached models, or fetched as a delta (``delta_stream``).
- ``delta_stream``: an update fetched as a delta from a cached version.
"""
