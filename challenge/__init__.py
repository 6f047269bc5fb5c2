"""The shared experimental regime of ILSVRC as a server over a challenge release.

A challenge release (`synsetforge release build --challenge`) lists its test images without labels; their labels
and boxes live under the store's private prefix, which only this package reads. Around them: teams with hashed
API tokens, phases with submission limits enforced atomically in the database (SQLite by default, PostgreSQL for
a deployment), validation that lists every problem of a submission, scoring through `pipeline.evaluate`, public
and private leaderboards with bootstrap intervals (Russakovsky et al., IJCV 2015, sec. 6.2), an optional Ladder
(Blum & Hardt, ICML 2015), flags for near-identical submissions and the per-class analysis of sec. 6.3.

Modules: `truth` (the hidden test set), `scoring` (parse, validate, per-image evaluation, bootstrap, Ladder),
`db` (SQLAlchemy 2 models and engines), `service` (the operations, with the limits), `boards` (leaderboards and
snapshots), `analysis` (scale, instances, CPL), `web` (the Starlette app and its pages), `cli`, `demo`.
"""
