from libdjinn.openai.cli import main

main()
