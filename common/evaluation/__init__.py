"""Greedy generation, TriviaQA scores, and evaluate.py."""
