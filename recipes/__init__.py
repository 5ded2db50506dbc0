"""Recipes that reproduce the paper's small-scale experiments end to end (mtp-recipe): generate a task's data,
preprocess it with mtp-preprocess's code, train parameter-matched models with n = 1, 2, 4 future tokens with
mtp-train, evaluate them with mtp-eval's functions, and write a results table and a plot."""
