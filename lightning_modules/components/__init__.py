"""nn building blocks shared by two or more methods (backbone construction, common layers)."""
