"""Everything Label Studio: a local server, a retrying client, labeling configs, provisioning, task push,
vote pull, gold controls and simulated annotators.

The modules are generic over the labeling config: a `TaskKind` (crowd.push) names the config file, how a
request becomes task data, and how an annotation's `result` maps back to per-image answers, so the boxes
stage reuses provision/push/pull with its own kinds.
"""
