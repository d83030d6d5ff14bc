"""The client side: one local round for every strategy (`round.run_round`), and the pruned
copies of the base a FedSpine client keeps between rounds (`pruned`)."""
