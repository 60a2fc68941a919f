"""The cross-validated study: its config, cells, runner, statistics, light store and document."""
