"""nn.Modules that lkfx passes insert into models (reparameterisable large-kernel blocks, ...)."""
