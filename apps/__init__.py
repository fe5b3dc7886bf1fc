"""hiss domain apps on ssm_core, each with the same rooms (data, model, train, evaluate, generate/predict, demo,
configs) on the shared kit in apps.common. The floor plan and how to add a domain: docs/apps.md."""
