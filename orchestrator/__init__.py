"""Driver side: CLI, configuration loading, search, tracking, Pareto fronts, export."""
