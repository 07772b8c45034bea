"""The explorer page: a local web page over a trained model, one slider per structure and region."""
