"""The step loop and what it calls: model runner, sampling, stopping, placement."""
