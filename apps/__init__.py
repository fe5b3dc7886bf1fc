"""hiss domain apps: genomics, audio, vision, text. Each app: data.py, model.py/heads.py, train.py, demo.py,
configs/. Shared Lightning and demo glue lives in apps.common; SSM maths lives in ssm_core."""
