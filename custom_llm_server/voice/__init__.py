"""The custom voice: speakable segments, PCM framing and pacing, the engines, and every source of an audio answer."""
