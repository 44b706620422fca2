from batchllm.cli import app

app(prog_name="batchllm")
