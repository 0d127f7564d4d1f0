"""livecall: answer phone calls with a Gemini Live voice agent."""

__version__ = "0.1.0"
