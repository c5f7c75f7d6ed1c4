"""The inference engine: sequences, block pool, scheduler, model runner, sampler, sync and async APIs."""
