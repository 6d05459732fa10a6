"""Data primitives below the tasks: reading files, rendering chats, packing, batches and data order."""
